//! The `refract` command's work, a file per group of commands: [`serve`]
//! (`run`), [`demo`], [`remote`] (`produce`, `rebuild`, `status`,
//! `dead-letters`: a running runtime over HTTP), [`plugin`] (`plugin new |
//! build | check`, over [`authoring`]).

pub mod authoring;
pub mod demo;
pub mod plugin;
pub mod remote;
pub mod serve;
