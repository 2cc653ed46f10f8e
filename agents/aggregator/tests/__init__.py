"""Tests of the aggregator agent."""
