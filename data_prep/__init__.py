"""data_prep: convert image datasets to FFCV .beton files (run once, then train many times)."""
