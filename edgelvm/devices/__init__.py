"""Device knowledge: memory-bandwidth probe and roofline arithmetic (profiles and fit checks come with issue 7)."""
