"""Hand-written Triton kernels, registered with torch.library so torch.compile traces them."""
