"""Training runs remember where a person watches them (the bot's status message).

A bot killed during /retrain leaves its run "running" and the admin's status message at its
last step; at the next start the bot closes the run and edits that message, so it must be
stored with the run.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Must match ffengine/db/models.py (tests/test_migrations.py compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("progress_message", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("training_runs", "progress_message")
