"""Histogram observers: accumulation under torch's or the power-of-two grid, torch's L2 range search
(on the device, or on the host), and the percentile, MSE and entropy calibrators."""
