"""The service around the domain: job kinds, job store and queue, artifacts, metrics, settings, logging, domain errors and their problem details. No torch."""
