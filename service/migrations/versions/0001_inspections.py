"""The inspections table: every answered inspection, its media and its review.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("raw_score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("is_anomalous", sa.Boolean(), nullable=False),
        sa.Column("denoise_step", sa.Integer(), nullable=False),
        sa.Column("queue_wait_s", sa.Float(), nullable=False),
        sa.Column("inference_s", sa.Float(), nullable=False),
        sa.Column("total_s", sa.Float(), nullable=False),
        sa.Column("part_id", sa.String(128)),
        sa.Column("camera_id", sa.String(128)),
        sa.Column("line_id", sa.String(128)),
        sa.Column("image_path", sa.String(255)),
        sa.Column("heatmap_path", sa.String(255)),
        sa.Column("media_expired", sa.Boolean(), nullable=False),
        sa.Column("review_label", sa.String(16)),
        sa.Column("review_note", sa.String(2000)),
        sa.Column("reviewed_by", sa.String(64)),
        sa.Column("reviewed_at", sa.DateTime()),
    )
    for column in ("request_id", "time", "product", "is_anomalous", "part_id", "review_label"):
        op.create_index(f"ix_inspections_{column}", "inspections", [column])


def downgrade() -> None:
    op.drop_table("inspections")
