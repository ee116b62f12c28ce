"""torch's uniform observers: running min/max (per tensor, per channel, moving average), fixed
qparams, placeholders, recording, their ``calculate_qparams`` rule and torch's presets."""
