"""Reports people look at rather than read: PNG plots beside the JSON."""
