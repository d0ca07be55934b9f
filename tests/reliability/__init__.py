"""The reliability suite: chaos, retry storms, control-plane faults, bad input, secrets; soak.py for the long run."""
