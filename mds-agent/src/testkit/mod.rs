pub mod sandbox;
pub mod fake_metadata;
pub mod fake_iam;
pub mod harness;
