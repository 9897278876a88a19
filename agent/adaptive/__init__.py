"""Does switching pay? The adaptive agent against every fixed choice, on one scripted pressure schedule.

`replay` sends labelled inputs open loop and records each request as a client sees it; `thermal`
fakes a board's sensors in a sysfs tree; `pressure` plays the schedule (calm, CPU contention,
a thermal trace); `serve` runs one agent through it; `score` turns the requests into a row.
"""
