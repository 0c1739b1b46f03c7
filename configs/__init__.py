"""Config files: one get_config() each; see each docstring for command, hardware, time."""
