"""What the controller, the agent and the installer all import, without each
other's heavy dependencies: the TOML/problem reader and process records."""
