"""Configuration: the typed schema (``schema``), command-line overrides and their quoting
(``overrides``), OmegaConf resolvers (``resolvers``), the study's display names of runs
(``naming``) and the upgrades of configs written by earlier versions (``compat``)."""
