"""Alembic's environment: migrations run on the connection service.records hands over."""

from alembic import context

from service.records import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
