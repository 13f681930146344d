"""Alembic migrations for the FocusedFashion database (``ffengine.db``).

A package so that it ships with an installed FocusedFashion and is found without
relying on the working directory: ``ffengine.db.migrate`` points Alembic here.
"""
