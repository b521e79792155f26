"""Measurements of models: complexity (params, multiply-adds), throughput, profiles."""
