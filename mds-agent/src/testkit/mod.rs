pub mod fake_iam;
pub mod fake_metadata;
pub mod harness;
pub mod sandbox;
