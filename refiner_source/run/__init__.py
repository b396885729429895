"""How the service is run: the command line, the supervisor of `serve`, gunicorn's settings."""
