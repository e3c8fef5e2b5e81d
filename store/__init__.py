"""The node's durable store, shared by every way in and out: the SQL index of studies, series
and instances (SQLite or PostgreSQL, schema by `migrations/`), the spool of received files, the
one outbox for PACS, RIS and FHIR, and the result records (result columns, waiting-list row,
decision record). Imports `core` only."""
