/* The test programs' handshake with their test through files in a work directory: the test
 * creates a file to let the program go on, the program one to say where it is. */
#ifndef WORK_DIR_H
#define WORK_DIR_H

#include <stdio.h>
#include <unistd.h>

/* Whether DIR/name exists. */
static inline int exists(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* Creates DIR/name. */
static inline void touch(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (f != NULL)
        fclose(f);
}

#endif
