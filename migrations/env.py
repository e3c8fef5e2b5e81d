"""Alembic environment for the index. `store.index.upgrade` passes the connection in
``config.attributes["connection"]``; the standalone `alembic` CLI is not needed."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ris import orders  # noqa: F401 - 0006: orders
from store import results  # noqa: F401 - 0006: waiting_list

# imported for the tables they declare on Base (the autogenerate comparison must see them)
from store.index import Base  # and the one outbox (0007)
from workspace import tables  # noqa: F401 - 0005: users, sessions, audit...

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
