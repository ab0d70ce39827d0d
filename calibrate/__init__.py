"""Offline calibration toolchain: models, data, activation measurement, search, evaluation, reports."""
