"""Subcommands of the `nemotron-diffusion` command line (see `nemotron_diffusion.cli`)."""
