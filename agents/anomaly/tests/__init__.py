"""Tests of the anomaly agent."""
