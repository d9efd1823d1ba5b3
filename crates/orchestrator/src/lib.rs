//! cairn-orchestrator
