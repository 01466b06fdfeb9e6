"""The merge executor and its file sink (the streaming merge engine)."""
