"""What tests share: tiny models and checkpoints (models.py), a server in a thread
(server.py), training workspaces and the CLI in a subprocess (train.py)."""
