//! The `refract` command's work, a file per group of commands: [`serve`]
//! (`run`), [`demo`], [`remote`] (`produce`, `rebuild`, `status`,
//! `dead-letters`: a running runtime over HTTP), [`preview`] (`rebuild
//! --preview`, `preview diff | promote | discard`), [`plugin`] (`plugin new |
//! build | test | check`, over [`authoring`] and [`plugin_test`]).

pub(crate) mod authoring;
pub(crate) mod demo;
pub(crate) mod plugin;
pub(crate) mod plugin_test;
pub(crate) mod preview;
pub(crate) mod remote;
pub(crate) mod serve;
