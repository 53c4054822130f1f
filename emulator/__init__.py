"""LPDDR emulation: device profiles, the step cost model, trace readers and full-scale replay."""
