"""pytest-benchmark comparisons of the stock ESPnet layer and flash_mha (see README)."""
