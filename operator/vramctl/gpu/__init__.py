"""The GPU port: how much memory is used and by whom (NVML, or a simulated
GPU whose memory follows the declared ``vramMiB``), and pid -> owner through
cgroups."""
