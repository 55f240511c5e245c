pub mod control;
pub mod device;
pub mod drive;
pub mod exchange;
pub mod fixtures;
pub mod ofd;
pub mod register;
pub mod store;
