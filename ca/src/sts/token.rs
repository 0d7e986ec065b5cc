//! See [`super`]; being built (issue 14).
