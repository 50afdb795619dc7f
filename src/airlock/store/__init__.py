"""The database: tables, the engine, the queries and the Alembic migrations. Only this
package talks SQL."""
