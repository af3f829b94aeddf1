//! KVM pieces kvm-ioctls does not wrap: dirty log clearing and dirty ring harvesting.
