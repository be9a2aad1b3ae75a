"""Worker scripts that tests start under mpiexec, a gloo group, horovodrun or torchrun."""
