//! Datasets and what is known about their labels.

pub mod cityscapes;
