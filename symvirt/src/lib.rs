//! Coordination of a whole virtual cluster's migration (work in progress).
