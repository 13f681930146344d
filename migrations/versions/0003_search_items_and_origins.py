"""Items seen in a photo, and searches started from a button ("Which item?", "More like this").

``searches`` gains the photo's downloadable Telegram ``file_id`` (a plain column: SQLite adds
and drops it in place). What is new lives in new tables, so ``searches`` is never copied: on
SQLite, dropping the old copy of a table cascades into the rows that reference it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09

Must match ffengine/db/models.py (tests/test_migrations.py compares them).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("searches", sa.Column("file_id", sa.String(length=256), nullable=True))

    op.create_table(
        "search_items",
        sa.Column("search_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("category", sa.String(length=128), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("box_left", sa.Integer(), nullable=False),
        sa.Column("box_top", sa.Integer(), nullable=False),
        sa.Column("box_right", sa.Integer(), nullable=False),
        sa.Column("box_bottom", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "box_left >= 0 AND box_top >= 0 AND box_right > box_left AND box_bottom > box_top",
            name=op.f("ck_search_items_box_valid"),
        ),
        sa.CheckConstraint("position >= 0", name=op.f("ck_search_items_position_nonnegative")),
        sa.CheckConstraint("probability >= 0 AND probability <= 1", name=op.f("ck_search_items_probability_fraction")),
        sa.ForeignKeyConstraint(
            ["search_id"], ["searches.id"], name=op.f("fk_search_items_search_id_searches"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("search_id", "position", name=op.f("pk_search_items")),
    )

    op.create_table(
        "search_origins",
        sa.Column("search_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("parent_search_id", sa.Integer(), nullable=False),
        sa.Column("item_index", sa.SmallInteger(), nullable=True),
        sa.Column("source_recommendation_id", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "(kind = 'item' AND item_index IS NOT NULL AND source_recommendation_id IS NULL)"
            " OR (kind = 'more_like' AND item_index IS NULL AND source_recommendation_id IS NOT NULL)",
            name=op.f("ck_search_origins_kind_matches_source"),
        ),
        sa.ForeignKeyConstraint(
            ["parent_search_id"],
            ["searches.id"],
            name=op.f("fk_search_origins_parent_search_id_searches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["search_id"], ["searches.id"], name=op.f("fk_search_origins_search_id_searches"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["source_recommendation_id"],
            ["recommendations.id"],
            name=op.f("fk_search_origins_source_recommendation_id_recommendations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("search_id", name=op.f("pk_search_origins")),
    )
    op.create_index(op.f("ix_search_origins_parent_search_id"), "search_origins", ["parent_search_id"])
    op.create_index(
        op.f("ix_search_origins_source_recommendation_id"), "search_origins", ["source_recommendation_id"]
    )


def downgrade() -> None:
    op.drop_table("search_origins")
    op.drop_table("search_items")
    op.drop_column("searches", "file_id")
