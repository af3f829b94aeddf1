! One-sided communication from Fortran under the transparent layer (rma.c's contract): while a
! window is open a rank refuses to be migrated, the job goes on unharmed, and once the window
! is freed migrations work again. With Open MPI the Fortran window calls reach the layer only
! through its own Fortran entry points (mpi_win_allocate_, mpi_win_fence_, mpi_win_free_).
!
!   rma_f DIR
!
! Phase 1: a window made by mpi_win_allocate on MPI_COMM_WORLD; rounds of two fences until
! DIR/phase2 exists (all ranks agree at an Allreduce every 8 rounds); with Open MPI, an
! mpi_put to the right neighbour between the fences, each value checked (Debian's MPICH 4.0.2
! puts data at wrong addresses on this machine; see rma.c). Then the window is freed. Rank 0
! creates DIR/open once every rank has its window, DIR/freed once they are freed. Phase 2:
! ring traffic (mpi_sendrecv, checked) until DIR/stop exists. Prints
! "rma_f OK rank R rounds N ring M".
program rma_f
  use mpi
  use iso_c_binding
  implicit none
  integer :: me, np, ierr, win, right, left, resultlen, all
  integer(kind=MPI_ADDRESS_KIND) :: wsize, baseptr, disp
  integer(8), pointer, volatile :: slot(:)
  integer(8) :: rounds, ring, value, want, out, in
  character(len=1024) :: dir
  character(len=MPI_MAX_LIBRARY_VERSION_STRING) :: version
  logical :: puts

  call mpi_init(ierr)
  call mpi_comm_rank(MPI_COMM_WORLD, me, ierr)
  call mpi_comm_size(MPI_COMM_WORLD, np, ierr)
  call get_command_argument(1, dir)
  right = mod(me + 1, np)
  left = mod(me + np - 1, np)
  call mpi_get_library_version(version, resultlen, ierr)
  puts = index(version, 'Open MPI') > 0

  wsize = 8
  call mpi_win_allocate(wsize, 8, MPI_INFO_NULL, MPI_COMM_WORLD, baseptr, win, ierr)
  call c_f_pointer(transfer(baseptr, c_null_ptr), slot, [1])
  slot(1) = -1
  ! Every rank has its window once every rank is past this barrier.
  call mpi_barrier(MPI_COMM_WORLD, ierr)
  call touch('open')
  rounds = 0
  disp = 0
  do
    value = ishft(int(me, 8), 32) + rounds
    call mpi_win_fence(0, win, ierr)
    if (puts) call mpi_put(value, 1, MPI_INTEGER8, right, disp, 1, MPI_INTEGER8, win, ierr)
    call mpi_win_fence(0, win, ierr)
    want = ishft(int(left, 8), 32) + rounds
    if (puts .and. slot(1) /= want) call fail('value put by the left neighbour', slot(1), want)
    rounds = rounds + 1
    if (mod(rounds, 8_8) == 0) then
      if (flag('phase2')) exit
    end if
  end do
  call mpi_win_free(win, ierr)
  if (win /= MPI_WIN_NULL) call fail('mpi_win_free left the handle', int(win, 8), 0_8)
  call touch('freed')

  ring = 0
  do
    if (mod(ring, 64_8) == 0) then
      if (flag('stop')) exit
    end if
    out = ishft(int(me, 8), 32) + ring
    call mpi_sendrecv(out, 1, MPI_INTEGER8, right, 7, in, 1, MPI_INTEGER8, left, 7, &
                      MPI_COMM_WORLD, MPI_STATUS_IGNORE, ierr)
    want = ishft(int(left, 8), 32) + ring
    if (in /= want) call fail('ring message', in, want)
    ring = ring + 1
  end do
  write (*, '(a,i0,a,i0,a,i0)') 'rma_f OK rank ', me, ' rounds ', rounds, ' ring ', ring
  flush (6)
  call mpi_finalize(ierr)

contains

  subroutine fail(what, got, expected)
    character(len=*), intent(in) :: what
    integer(8), intent(in) :: got, expected
    write (0, '(a,i0,a,a,a,i0,a,i0)') 'rma_f FAIL rank ', me, ': ', what, ': got ', got, &
      ' want ', expected
    call mpi_abort(MPI_COMM_WORLD, 3, ierr)
  end subroutine

  ! Rank 0 creates DIR/name: tells the test where the job is.
  subroutine touch(name)
    character(len=*), intent(in) :: name
    if (me /= 0) return
    open (unit=21, file=trim(dir)//'/'//name, status='replace', action='write')
    close (21)
  end subroutine

  ! Whether DIR/name exists on rank 0's view (all ranks agree).
  logical function flag(name)
    character(len=*), intent(in) :: name
    logical :: here
    integer :: mine
    inquire (file=trim(dir)//'/'//name, exist=here)
    mine = 0
    if (me == 0 .and. here) mine = 1
    call mpi_allreduce(mine, all, 1, MPI_INTEGER, MPI_MAX, MPI_COMM_WORLD, ierr)
    flag = all == 1
  end function
end program
