/* placeholder */
#include <mpi.h>
int symvirt_pmpi_loaded(void) { return 1; }
