//! Convergence policy.
