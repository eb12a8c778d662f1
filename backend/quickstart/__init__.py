"""``seggpt-backend quickstart``: the whole labeling loop on one machine, with no setup.

It installs Label Studio 1.23.2 into its own virtualenv when needed, starts it with a generated
superuser, serves this backend against it, creates a demo project once (bundled images of two
classes, two of them annotated), pre-labels the rest and prints where to log in. See
``backend.quickstart.runner`` for the flow and ``backend.quickstart.state`` for what is kept on disk.
"""
