"""The aggregator agent: counts and summarises the events and alerts it may read into
one digest per day, kept in its own KV bucket for a bounded number of days."""
