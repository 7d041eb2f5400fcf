"""Research scripts (kernel A/Bs, decode-speed sweeps, parity checks); run from the
repository root as ``python -m benchmarks.NAME``. Not part of the installed package."""
