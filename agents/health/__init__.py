"""The health agent: reads Apple Health exports from a read-only folder, remembers
per-day steps, sedentary time and heart rate variability in its KV bucket, and proposes
a walk break when the owner has been sitting too long."""
