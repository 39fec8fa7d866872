//! Definitions: the tasks platform teams publish.
