//! Shrunk failures of the store property, each kept as a named test with a one-line
//! post-mortem. None so far: 2,500 cases of
//! `store_agrees_with_the_model_across_restarts_and_rebuilds` passed when it was written.
