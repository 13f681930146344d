"""Erasures: which user a /forget erased, and at which update, so that a search of an earlier update
logged afterwards (by another replica) is refused.

One new table, nothing existing is altered.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08

Must match ffengine/db/models.py (tests/test_migrations.py compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("update_id", sa.BigInteger(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_erasures")),
    )
    op.create_index(op.f("ix_erasures_erased_at"), "erasures", ["erased_at"])


def downgrade() -> None:
    op.drop_table("erasures")
