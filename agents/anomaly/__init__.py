"""The anomaly agent: watches the audit stream (read-only) and raises explained alerts
on ``mas.alert.<kind>`` for refusal bursts, token requests at quiet hours, identities
never seen before, error-rate spikes and rises in sensitive-action requests."""
